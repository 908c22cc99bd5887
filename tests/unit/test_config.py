import pytest

from curation.config import ConfigError, load_run_config, parse_run_config


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


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("input: !!python/object/apply:os.system ['echo owned']\nstages: [ingest]\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_run_config(path)


def test_the_boilerplate_rule_is_turned_off_by_null_in_yaml_or_zero():
    from curation.config import stage_options

    assert stage_options("filter", {}, {})["max_caption_repeats"] == 1000
    assert stage_options("filter", {"max_caption_repeats": None}, {})["max_caption_repeats"] is None
    assert stage_options("filter", {"max_caption_repeats": 0}, {})["max_caption_repeats"] is None
    assert stage_options("filter", {"max_caption_repeats": 10}, {})["max_caption_repeats"] == 10
    # other options keep "null means the default"
    assert stage_options("nsfw", {"batch_size": None}, {})["batch_size"] == 64
