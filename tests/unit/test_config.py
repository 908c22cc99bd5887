import pytest

from curation.config import ConfigError
from curation.stages import load_run_config, parse_run_config


def test_defaults_and_run_level_values_fill_stage_options():
    config = parse_run_config(
        {"input": "x", "metadata": "m.json", "seed": 5, "name": "n",
         "stages": ["ingest", "match", "count", {"balance": {"t": 10}}, "publish"]}
    )
    options = {s.name: s.options for s in config.stages}
    assert options["match"]["metadata"] == "m.json"
    assert options["balance"] == {"t": 10, "target_size": None, "tail_share": None, "seed": 5, "partitions": None}
    assert options["publish"]["name"] == "n"
    assert options["ingest"]["max_caption_chars"] == 4096


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"stages": ["ingest"]}, "`input` is required"),
        ({"input": "x", "stages": ["ingest"], "bogus": 1}, "unknown top-level"),
        ({"input": "x", "stages": ["ingest", {"match": {"metadata": "m", "typo": 1}}]}, "unknown option"),
        ({"input": "x", "stages": ["ingest", "match"]}, "needs `metadata`"),
        ({"input": "x", "stages": ["match"], "metadata": "m"}, "first stage must be ingest"),
        ({"input": "x", "stages": ["ingest", "frobnicate"]}, "unknown stage"),
        ({"input": "x", "stages": []}, "empty"),
    ],
)
def test_bad_configs_name_the_problem(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"seed": 1.7}, r"`seed` must be an integer, got 1.7"),
        ({"seed": [1, 2]}, r"`seed` must be an integer, got \[1, 2\]"),
        ({"seed": "abc"}, r"`seed` must be an integer, got 'abc'"),
        ({"seed": True}, r"`seed` must be an integer, got True"),
        ({"name": ["a"]}, r"`name` must be a non-empty string, got \['a'\]"),
        ({"name": ""}, r"`name` must be a non-empty string, got ''"),
        ({"spark": {"partitions": -1}}, r"`spark.partitions` must be an integer >= 1 \(or null: Spark's\), got -1"),
        ({"spark": {"partitions": 0}}, r"`spark.partitions` must be an integer >= 1"),
        ({"spark": {"master": 3}}, r"`spark.master` must be a Spark master URL"),
        ({"spark": {"conf": ["spark.driver.memory=8g"]}}, r"`spark.conf` must map Spark settings to values"),
        ({"stages": "ingest"}, r"`stages` must be a list of stages, got 'ingest'"),
        ({"stages": ["ingest", "count", "ingest"]},
         r"`stages`: ingest is listed again at position 3; it reads the raw shards and runs once, first"),
        ({"stages": ["ingest", "publish", "sample"]},
         r"`stages`: sample comes after publish \(position 2\); publish writes the release and must be the last"),
        ({"stages": ["ingest", "publish", "sample", "publish"]}, r"`stages`: sample, publish come after publish"),
    ],
)
def test_run_level_keys_and_stage_order_are_checked_naming_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config({"input": "x", "stages": ["ingest"], **raw})


def test_a_stage_may_repeat_between_ingest_and_publish():
    config = parse_run_config({"input": "x", "stages": ["ingest", {"sample": {"fraction": 0.5}}, "sample", "publish"]})
    assert [stage.name for stage in config.stages] == ["ingest", "sample", "sample", "publish"]


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("input: !!python/object/apply:os.system ['echo owned']\nstages: [ingest]\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_run_config(path)


def test_the_boilerplate_rule_is_turned_off_by_null_in_yaml_or_zero():
    from curation.stages import stage_options

    assert stage_options("filter", {}, {})["max_caption_repeats"] == 1000
    assert stage_options("filter", {"max_caption_repeats": None}, {})["max_caption_repeats"] is None
    assert stage_options("filter", {"max_caption_repeats": 0}, {})["max_caption_repeats"] is None
    assert stage_options("filter", {"max_caption_repeats": 10}, {})["max_caption_repeats"] == 10
    # other options keep "null means the default"
    assert stage_options("nsfw", {"batch_size": None}, {})["batch_size"] == 64


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"balance": {"t": 100, "target_size": 5000}}, r"stage balance: give at most one of t, target_size, "
                                                       r"tail_share \(got t, target_size\)"),
        ({"balance": {"t": "many"}}, r"stage balance: option t is 'many'; allowed: a number > 0 \| null"),
        ({"dedup_text": {"num_perm": 12.5}}, r"stage dedup_text: option num_perm is 12.5; allowed: an integer"),
        ({"balance": {"tail_share": 1.5}},
         r"stage balance: option tail_share is 1.5; allowed: a number in \(0, 1\] \| null"),
        ({"semdedup": {"eps": float("nan")}}, r"stage semdedup: option eps is nan; allowed: a number in \(0, 2\)"),
        ({"prune": {"keep_fraction": 0.5, "selection": "hardest"}},
         r"stage prune: option selection is 'hardest'; allowed: hard \| easy \| random"),
        ({"prune": {"k": 10}}, r"stage prune: give exactly one of keep_fraction, keep_count \(got none\)"),
        ({"filter": {"min_clip_score": 0.2, "min_clip_scor": 0.3}},
         r"stage filter: unknown option\(s\) \['min_clip_scor'\]; options are \[.*'min_clip_score'"),
        # issue 18: exact image near duplicates retired the anchor options of dedup_image
        ({"dedup_image": {"max_anchors": 8}}, r"stage dedup_image: unknown option\(s\) \['max_anchors'\]"),
        ({"download": {"allow_hosts": "127.0.0.1:80"}}, r"stage download: option allow_hosts is '127.0.0.1:80'; "
                                                        r"allowed: a list of non-empty strings"),
        # issue 17 case 10: a quoted boolean, a zero target, a fractional seed, blank text
        ({"ingest": {"skip_bad_files": "false"}}, r"stage ingest: option skip_bad_files is 'false'; allowed: true"),
        ({"balance": {"target_size": 0}}, r"stage balance: option target_size is 0; allowed: an integer >= 1"),
        ({"sample": {"seed": 1.7}}, r"stage sample: option seed is 1.7; allowed: an integer"),
        ({"dedup_image": {"image_column": " "}}, r"stage dedup_image: option image_column is ' '; allowed: a "
                                                 r"non-empty string"),
        ({"ingest": {"keep_columns": ["w", ""]}}, r"option keep_columns is \['w', ''\]; allowed: a list of non-empty"),
        # issue 17 case 13
        ({"dedup_exact": {"partitions": -1}},
         r"stage dedup_exact: option partitions is -1; allowed: an integer >= 1 \| null"),
        ({"ingest": {"keep_columns": "WIDTH"}}, r"stage ingest: option keep_columns is 'WIDTH'; allowed: a list"),
        # a zero limit would ledger every caption as caption_too_long
        ({"ingest": {"max_caption_chars": 0}}, r"stage ingest: option max_caption_chars is 0; allowed: an integer >="),
    ],
)
def test_option_errors_fail_at_load_naming_stage_option_and_allowed_values(stage, message):
    stages = [stage, "match"] if "ingest" in stage else ["ingest", "match", stage]
    with pytest.raises(ConfigError, match=message):
        parse_run_config({"input": "x", "metadata": "m.json", "stages": stages})


def test_a_bad_config_fails_before_spark_starts(tmp_path):
    """`curation run` exits 2 with the one-line error, and pyspark was never imported."""
    import subprocess
    import sys

    config = tmp_path / "run.yaml"
    config.write_text("input: x\nmetadata: m.json\nstages: [ingest, match, {balance: {t: 100, target_size: 5}}]\n")
    script = ("import sys\nfrom curation.cli import main\ncode = main(['run', sys.argv[1], '--output', sys.argv[2]])\n"
              "print(code, 'pyspark' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script, str(config), str(tmp_path / "run")], capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"]
    assert "stage balance: give at most one of t, target_size, tail_share" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()

