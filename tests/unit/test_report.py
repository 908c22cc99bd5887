"""`curation report`: every section on small hand-made run folders, its note when its stages are absent, escaping,
self-containment and determinism."""

import base64
import io
import json
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.io import StageWriter
from curation.report import SECTION_IDS, build_report, write_report
from curation.report.reading import ReportError
from curation.run_folder import Artifact

HOSTILE = '<script>alert("x")</script> & <img src=http://evil.example/x.png>'


# ---------------------------------------------------------------------------------------------------- page checks


class PageParser(HTMLParser):
    """Collects what the checks need: section ids, image sources, links, tags, text by section."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, list[str]] = {}
        self.current: str | None = None
        self.images: list[tuple[str | None, str, str]] = []  # (section, css class, src)
        self.links: list[str] = []
        self.tags: set[str] = set()
        self.classes_by_section: dict[str, list[str]] = {}
        self.funnel_rows: list[dict] = []
        self._row: dict | None = None
        self._field: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.current = attributes["id"]
            self.sections[self.current] = []
        if self.current and attributes.get("class"):
            self.classes_by_section.setdefault(self.current, []).append(attributes["class"])
        if tag == "img":
            self.images.append((self.current, attributes.get("class", ""), attributes.get("src", "")))
        for name in ("href", "src", "action", "srcset", "poster", "data"):
            if name in attributes and tag != "img":
                self.links.append(attributes[name])
        if tag == "tr" and "data-stage" in attributes:
            self._row = {"stage": attributes["data-stage"]}
            self.funnel_rows.append(self._row)
        if tag == "span" and "data-field" in attributes and self._row is not None:
            self._field = attributes["data-field"]

    def handle_endtag(self, tag):
        if tag == "section":
            self.current = None
        if tag == "tr":
            self._row = None
        if tag == "span":
            self._field = None

    def handle_data(self, data):
        if self.current:
            self.sections[self.current].append(data)
        if self._field and self._row is not None:
            self._row[self._field] = int(data.replace(",", ""))


def parse_page(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def page_problems(page: str) -> list[str]:
    """Everything that breaks the report's promises: a missing section, an image that is not an inline PNG that
    decodes, a link or resource outside the page, a script."""
    parser = parse_page(page)
    problems = [f"section {s} is missing" for s in SECTION_IDS if s not in parser.sections]
    for section, _, src in parser.images:
        prefix = "data:image/png;base64,"
        if not src.startswith(prefix):
            problems.append(f"image in {section} is not an inline PNG: {src[:60]}")
            continue
        try:
            with Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True))) as image:
                image.load()
                if image.format != "PNG":
                    problems.append(f"image in {section} is {image.format}")
        except Exception as error:  # noqa: BLE001
            problems.append(f"image in {section} does not decode: {error}")
    problems += [f"external link {link}" for link in parser.links if not link.startswith("#")]
    forbidden = ("script", "link", "iframe", "object", "embed", "base")
    problems += [f"<{tag}> tag" for tag in forbidden if tag in parser.tags]
    if "url(" in page.split("</style>")[0]:
        problems.append("the style sheet loads a url()")
    return problems


def text_of(page: str, section: str) -> str:
    return " ".join(parse_page(page).sections[section])


def classes_in(page: str, section: str) -> list[str]:
    return parse_page(page).classes_by_section.get(section, [])


def is_absent(page: str, section: str) -> bool:
    return "absent" in classes_in(page, section)


# ---------------------------------------------------------------------------------------------------- run folders


def uids(n: int, offset: int = 0) -> list[str]:
    return [f"{i + offset:032x}" for i in range(n)]


class RunBuilder:
    """Writes stage folders (StageWriter, as the stages do) one after the other in `run_dir`."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.position = 0
        self.previous: Path | None = None

    def stage(self, name: str, rows: pa.Table | None, rows_in: int, ledger: pa.Table | None = None,
              artifacts: dict | None = None, config: dict | None = None, seconds: float = 1.5, **extra) -> Path:
        self.position += 1
        folder = self.run_dir / ("publish" if name == "publish" else f"stages/{self.position:02d}_{name}")
        with StageWriter(folder) as writer:
            writer.temp_dir.mkdir(parents=True)
            if rows is not None:
                pq.write_table(rows, writer.temp_dir / "part-00000.parquet")
            drops = {}
            if ledger is not None and len(ledger):
                writer.ledger_dir.mkdir(parents=True)
                pq.write_table(ledger, writer.ledger_dir / "part-00000.parquet")
                for reason in ledger.column("reason").to_pylist():
                    drops[reason] = drops.get(reason, 0) + 1
            for relative, write in (artifacts or {}).items():
                path = writer.artifacts_dir / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                write(path)
            rows_out = rows_in - sum(drops.values())
            writer.commit({
                "stage": name, "version": 1, "config": {"stage": name, **(config or {})},
                "input": {"stage": writer.link_to(self.previous) if self.previous else None, "fingerprint": "x"},
                "rows_in": rows_in, "rows_out": rows_out, "drops": dict(sorted(drops.items())),
                "started_at": "2025-01-01T00:00:00+00:00", "seconds": seconds, **extra,
            })
        self.previous = folder
        return folder


def ledger(uid_list, stage, reason, related=None, details=None) -> pa.Table:
    n = len(uid_list)
    return pa.table({
        "uid": pa.array(uid_list, pa.string()), "stage": pa.array([stage] * n, pa.string()),
        "reason": pa.array([reason] * n, pa.string()),
        "related_uid": pa.array(related if related is not None else [None] * n, pa.string()),
        "detail": pa.array([json.dumps(d) for d in details] if details is not None else [None] * n, pa.string()),
    })


def rows_table(uid_list, captions=None, **columns) -> pa.Table:
    captions = captions if captions is not None else [f"caption number {u[-4:]}" for u in uid_list]
    return pa.table({"uid": uid_list, "url": [f"http://example.com/{u}.jpg" for u in uid_list],
                     "caption": captions, **columns})


def counts_writer(before, after=None, entries=None):
    entries = entries or [f"entry{i}" for i in range(len(before))]

    def write(path):
        columns = {"entry_id": pa.array(np.arange(len(before), dtype=np.int32)), "entry": entries}
        if after is None:
            columns["count"] = pa.array(before, pa.int64())
        else:
            columns["count_before"] = pa.array(before, pa.int64())
            columns["count_after"] = pa.array(after, pa.int64())
        pq.write_table(pa.table(columns), path)

    return write


def ingest_only(run_dir: Path, captions=None) -> RunBuilder:
    run = RunBuilder(run_dir)
    ids = uids(10)
    run.stage("ingest", rows_table(ids[:8], captions), 10,
              ledger(ids[8:], "ingest", "empty_caption"))
    return run


def png_bytes(colour, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path: Path, samples: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, data in samples.items():
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------------- tests


def test_a_run_of_ingest_only_has_every_section_and_notes_for_the_absent_stages(tmp_path):
    ingest_only(tmp_path)
    path = write_report(tmp_path)
    assert path == tmp_path / "report.html"
    page = path.read_text()
    assert page_problems(page) == []
    for section in ("balancing", "dedup", "pruning", "logos", "scores", "manifest"):
        assert is_absent(page, section), section
        assert "Not in this run" in text_of(page, section)
    for section in ("funnel", "captions", "throughput"):
        assert not is_absent(page, section), section
    assert all("error" not in classes_in(page, s) for s in SECTION_IDS)
    rows = parse_page(page).funnel_rows
    assert rows == [{"stage": "stages/01_ingest", "rows_in": 10, "rows_out": 8, "dropped": 2}]


def test_text_from_the_data_is_escaped(tmp_path):
    run = ingest_only(tmp_path, captions=[HOSTILE] * 8)
    ids = uids(8)
    run.stage("match", rows_table(ids[:6], [HOSTILE] * 6), 8, ledger(ids[6:], "match", "<b>odd reason</b>"))
    entries = [HOSTILE, "plain"]
    run.stage("balance", rows_table(ids[:6], [HOSTILE] * 6), 6,
              artifacts={"balanced_counts.parquet": counts_writer([5, 3], [4, 3], entries)},
              balancing={"t": 4.0, "t_from": "t", "tail_share_before": 0.3, "tail_share_after": 0.4})
    page = build_report(tmp_path)
    assert page_problems(page) == []
    assert "<script" not in page and "<b>odd" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;odd reason&lt;/b&gt;" in page
    assert HOSTILE in text_of(page, "balancing")  # shown as text, not markup
    assert "<b>odd reason</b>" in text_of(page, "funnel")


def test_two_balance_stages_each_get_their_distribution(tmp_path):
    run = ingest_only(tmp_path)
    ids = uids(8)
    run.stage("count", None, 8, artifacts={"entry_counts.parquet": counts_writer([50, 20, 3, 1, 0])},
              data_from="../01_ingest")
    run.stage("balance", rows_table(ids[:6]), 8, ledger(ids[6:], "balance", "balance_not_drawn"),
              artifacts={"balanced_counts.parquet": counts_writer([50, 20, 3, 1, 0], [10, 10, 3, 1, 0])},
              balancing={"t": 10.0, "t_from": "t", "tail_share_before": 0.05, "tail_share_after": 0.17})
    run.stage("count", None, 6, artifacts={"entry_counts.parquet": counts_writer([10, 10, 3, 1, 0])},
              data_from="../03_balance")
    run.stage("balance", rows_table(ids[:5]), 6, ledger(ids[5:6], "balance", "balance_not_drawn"),
              artifacts={"balanced_counts.parquet": counts_writer([10, 10, 3, 1, 0], [5, 5, 3, 1, 0])},
              balancing={"t": 5.0, "t_from": "target_size", "tail_share_before": 0.17, "tail_share_after": 0.29})
    page = build_report(tmp_path)
    assert page_problems(page) == []
    text = text_of(page, "balancing")
    assert "balance 1 of 2" in text and "balance 2 of 2" in text
    assert "stages/03_balance" in text and "stages/05_balance" in text
    plots = [src for section, css, src in parse_page(page).images if section == "balancing" and css == "plot"]
    assert len(plots) == 2
    assert [row["rows_out"] for row in parse_page(page).funnel_rows] == [8, 8, 6, 6, 5]


def test_a_count_without_balance_shows_the_counts_and_a_balance_without_its_artifact_a_note(tmp_path):
    run = ingest_only(tmp_path)
    run.stage("count", None, 8, artifacts={"entry_counts.parquet": counts_writer([7, 2, 1])},
              data_from="../01_ingest")
    page = build_report(tmp_path)
    assert "No balance stage" in text_of(page, "balancing")
    assert any(section == "balancing" for section, _, _ in parse_page(page).images)

    other = tmp_path / "other"
    run = ingest_only(other)
    run.stage("balance", rows_table(uids(8)), 8, balancing={"t": 3.0, "t_from": "t"})
    page = build_report(other)
    assert page_problems(page) == []
    assert "balanced_counts.parquet is missing" in text_of(page, "balancing")


def test_scores_show_both_histograms_with_the_thresholds(tmp_path):
    run = ingest_only(tmp_path)
    ids = uids(8)
    rng = np.random.default_rng(0)
    clip = rng.uniform(0.1, 0.4, 8).astype(np.float32)
    nsfw = rng.uniform(0, 1, 8).astype(np.float32)
    run.stage("embed", rows_table(ids, clip_score=clip), 8)
    run.stage("filter", rows_table(ids[:6], clip_score=clip[:6]), 8,
              ledger(ids[6:], "filter", "low_clip_score"), config={"min_clip_score": 0.2})
    run.stage("nsfw", rows_table(ids[:5], clip_score=clip[:5], nsfw_score=nsfw[:5]), 6,
              ledger(ids[5:6], "nsfw", "nsfw"), config={"max_score": 0.9})
    page = build_report(tmp_path)
    assert page_problems(page) == []
    text = text_of(page, "scores")
    assert "clip_score" in text and "nsfw_score" in text
    assert [s for s, css, _ in parse_page(page).images].count("scores") == 1


def test_scores_without_embed_or_nsfw_say_so(tmp_path):
    ingest_only(tmp_path)
    page = build_report(tmp_path)
    assert "no embed (clip_score) or nsfw (nsfw_score) stage" in text_of(page, "scores")


def test_dedup_shows_group_sizes_and_a_gallery_of_image_duplicate_groups(tmp_path):
    run = ingest_only(tmp_path)
    ids = uids(8)
    images = {f"{i:09d}": png_bytes((30 * i, 200 - 20 * i, 90)) for i in range(8)}

    def tar(path):
        path.mkdir(parents=True, exist_ok=True)
        write_tar(path / "00000.tar", images)

    captions = [f"{HOSTILE} {i}" for i in range(8)]
    run.stage("dedup_text", rows_table(ids, captions, text_dup_group=[ids[0], ids[0], None, None, ids[4], ids[4],
                                                                       ids[4], None],
                                       text_dup_group_size=[2, 2, None, None, 3, 3, 3, None]), 8)
    run.stage("download", rows_table(ids, captions, image_shard=["00000.tar"] * 8, image_key=list(images)), 8,
              artifacts={Artifact.IMAGES: tar})
    near = ledger([ids[1], ids[2]], "dedup_image", "near_duplicate_image", [ids[0], ids[0]],
                  [{"group": ids[0], "rank": 2}, {"group": ids[0], "rank": 3}])
    exact = ledger([ids[5]], "dedup_image", "duplicate_image_bytes", [ids[4]], [{"sha256": "ab"}])
    run.stage("dedup_image", rows_table([ids[0], ids[3], ids[4], ids[6], ids[7]]), 8, pa.concat_tables([near, exact]),
              dedup_image={"max_distance": 4, "image_column": "jpg", "edges": 2})
    page = build_report(tmp_path)
    assert page_problems(page) == []
    parser = parse_page(page)
    thumbs = [src for section, css, src in parser.images if section == "dedup" and css == "thumb"]
    assert len(thumbs) == 5  # 3 near duplicates, then 2 identical
    for src in thumbs:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            assert max(image.size) <= 96
    text = text_of(page, "dedup")
    assert "near duplicates: 3 rows" in text and "identical bytes: 2 rows" in text
    assert text.index("near duplicates") < text.index("identical bytes")
    assert "dropped, rank 3" in text
    assert "<script" not in page


def test_a_gallery_without_the_images_shows_placeholders(tmp_path):
    run = ingest_only(tmp_path)
    ids = uids(8)
    run.stage("download", rows_table(ids, image_shard=["00000.tar"] * 8, image_key=[f"{i:09d}" for i in range(8)]),
              8)
    run.stage("dedup_image", rows_table(ids[:7]), 8,
              ledger([ids[7]], "dedup_image", "near_duplicate_image", [ids[0]], [{"group": ids[0], "rank": 2}]))
    page = build_report(tmp_path)
    assert page_problems(page) == []
    assert text_of(page, "dedup").count("no image") == 2


def test_pruning_and_semdedup(tmp_path):
    run = ingest_only(tmp_path)
    ids = uids(8)

    def sizes(path):
        pq.write_table(pa.table({"cluster": pa.array([0, 1], pa.int32()), "size": pa.array([5, 3], pa.int64())}), path)

    def clusters(path):
        pq.write_table(pa.table({"cluster": [0, 1], "size": [4, 3], "d_intra": [0.1, 0.2], "d_inter": [0.3, 0.4],
                                 "complexity": [0.03, 0.08], "probability": [0.4, 0.6], "quota": [2, 3]}), path)

    run.stage("cluster", rows_table(ids), 8, artifacts={"cluster_sizes.parquet": sizes},
              kmeans={"k": 2, "objective": 1.2345678, "sample_rows": 8})
    run.stage("semdedup", rows_table(ids[:7], semdedup_max_similarity=pa.array([None, 0.5, 0.7, 0.2, 0.9, 0.1, 0.3],
                                                                                pa.float32())), 8,
              ledger([ids[7]], "semdedup", "semantic_duplicate", [ids[1]], [{"similarity": 0.99, "cluster": 0}]),
              semdedup={"eps": 0.05, "threshold": 0.95, "eps_from": "eps"})
    run.stage("prune", rows_table(ids[:5]), 7, ledger(ids[5:7], "prune", "pruned_dense_cluster"),
              artifacts={"pruning_clusters.parquet": clusters}, prune={"n_keep": 5, "tau": 0.1})
    page = build_report(tmp_path)
    assert page_problems(page) == []
    assert [s for s, _, _ in parse_page(page).images].count("pruning") == 3
    text = text_of(page, "pruning")
    assert "1.23457" in text and "semantic duplicates" in text


def test_logos_show_the_contact_sheet_and_the_scores(tmp_path):
    run = ingest_only(tmp_path)
    ids = uids(8)

    def sheet(path):
        Image.new("RGB", (50, 20), "white").save(path, format="PNG")

    def mining(path):
        pq.write_table(pa.table({"logo_id": [HOSTILE, "b"], "target": ["greedy", "greedy"], "rank": [1, 2],
                                 "spuriousness": [0.25, 0.0], "flip_rate": [0.3, 0.0]}), path)

    run.stage("logo_bank", rows_table(ids), 8, logo_bank={"taken": 2, "entries": 2, "q": 0.01})
    run.stage("mine_logos", None, 8, artifacts={"contact_sheet.png": sheet, "mining.parquet": mining},
              data_from="../02_logo_bank", mining={"logos": 2, "targets": ["greedy"]})
    run.stage("flag_logos", rows_table(ids[:7]), 8, ledger([ids[7]], "flag_logos", "spurious_logo"),
              flag_logos={"logos": [HOSTILE], "threshold": 0.9, "policy": "drop"})
    page = build_report(tmp_path)
    assert page_problems(page) == []
    assert [css for s, css, _ in parse_page(page).images if s == "logos"] == ["sheet"]
    text = text_of(page, "logos")
    assert HOSTILE in text and "0.25" in text and "greedy" in text


def test_a_section_that_fails_shows_its_error_and_the_others_render(tmp_path):
    run = ingest_only(tmp_path)

    def broken(path):
        path.write_bytes(b"not parquet")

    run.stage("prune", rows_table(uids(8)), 8, artifacts={"pruning_clusters.parquet": broken}, prune={})
    page = build_report(tmp_path)
    assert page_problems(page) == []
    assert "error" in classes_in(page, "pruning")
    assert "could not be rendered" in text_of(page, "pruning")
    assert all("error" not in classes_in(page, s) for s in SECTION_IDS if s != "pruning")


def test_manifest_section_summarises_the_release(tmp_path):
    from curation.manifest import build_manifest, file_entry, release_sha256

    run = ingest_only(tmp_path)
    shard = rows_table(uids(8))
    folder = run.stage("publish", None, 8, shards=1)
    (folder / "shards").mkdir()
    pq.write_table(shard, folder / "shards" / "shard-00000.parquet")
    ingest = {"stage": "ingest", "folder": "01_ingest", "version": 1, "rows_in": 10, "rows_out": 8,
              "drops": {"empty_caption": 2}, "seconds": 0.1}
    manifest = build_manifest(
        name=HOSTILE, config={}, config_sha256="cd" * 32, inputs=[{"path": "in.parquet", "rows": 10}],
        skipped_inputs=[], stages=[ingest], shards=[file_entry(folder, folder / "shards" / "shard-00000.parquet")],
        ledger_files=[], metadata=None, balancing=None,
    )
    (folder / "manifest.json").write_text(json.dumps(manifest))
    page = build_report(tmp_path)
    assert page_problems(page) == []
    text = text_of(page, "manifest")
    assert HOSTILE in text and release_sha256(manifest) in text
    assert "<title>Curation report: &lt;script&gt;" in page
    assert "published" in text_of(page, "captions")


def test_the_report_is_deterministic_and_written_where_asked(tmp_path):
    ingest_only(tmp_path / "run")
    first = write_report(tmp_path / "run", tmp_path / "out" / "a.html")
    second = write_report(tmp_path / "run", tmp_path / "out" / "b.html")
    assert first == tmp_path / "out" / "a.html"
    assert first.read_bytes() == second.read_bytes()
    assert not (tmp_path / "run" / "report.html").exists()
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left


def test_stage_folders_outside_the_chain_are_noted(tmp_path):
    run = ingest_only(tmp_path)
    run.stage("match", rows_table(uids(8)), 8)
    (tmp_path / "stages" / "03_balance").mkdir()
    (tmp_path / "stages" / ".04_download.work").mkdir()
    page = build_report(tmp_path)
    assert "stages/03_balance: incomplete" in text_of(page, "funnel")
    assert ".04_download" not in page
    assert [row["stage"] for row in parse_page(page).funnel_rows] == ["stages/01_ingest", "stages/02_match"]


def test_a_folder_without_stages_is_refused(tmp_path):
    with pytest.raises(ReportError, match="no complete stage folder"):
        build_report(tmp_path)
    with pytest.raises(ReportError, match="not a folder"):
        build_report(tmp_path / "missing")


def test_an_empty_run_renders(tmp_path):
    run = RunBuilder(tmp_path)
    run.stage("ingest", rows_table([]), 0)
    run.stage("dedup_text", rows_table([], text_dup_group=pa.array([], pa.string()),
                                       text_dup_group_size=pa.array([], pa.int64())), 0)
    page = build_report(tmp_path)
    assert page_problems(page) == []
    assert all("error" not in classes_in(page, s) for s in SECTION_IDS)
