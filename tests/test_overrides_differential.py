"""Overrides compared with Hydra 1.3's own application of them (ConfigLoaderImpl._apply_overrides_to_config, and
the basic sweeper, which hands each job the text `key=value` of its point to parse again): each test states
what Hydra does with a literal override, and that ours does the same."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from forgather import overrides as ovr

BASE = {"lr": 0.001, "name": "foo", "n": 10, "d": {"a": 1, "b": 2}, "list": [1, 2, 3],
        "trainer": {"max_steps": 100, "precision": 32}}


def applied(*arguments: str) -> dict:
    config = OmegaConf.create(BASE)
    ovr.apply(config, ovr.parse(list(arguments), {}, multirun=False)[0])
    return OmegaConf.to_container(config, resolve=False)


def refusal(*arguments: str) -> str:
    with pytest.raises(ovr.OverrideError) as caught:
        applied(*arguments)
    message = str(caught.value)
    assert "\n" not in message
    return message


def points(*arguments: str) -> list[list[tuple[str, object]]]:
    return [[(o.text, o.value) for o in point] for point in ovr.parse(list(arguments), {}, multirun=True)]


def test_a_quoted_sweep_value_is_the_string_as_the_point_reparses_it():
    # Hydra's jobs get name=a and name='b c' and parse them: the strings a and b c.
    assert points("name=a,'b c','null'") == [[("name=a", "a")], [("name='b c'", "b c")], [("name='null'", "null")]]
    assert applied("name='b c'")["name"] == "b c"


def test_a_cast_sweep_gives_each_point_the_value_of_its_text():
    # Hydra's sweeper writes n=1 and n=2 for str(choice(1,2)); each job parses the int again.
    assert points("n=str(choice(1,2))") == [[("n=1", 1)], [("n=2", 2)]]


def test_a_shuffled_sweep_gives_each_point_the_value_its_text_says():
    swept = points("n=shuffle(1,2,3,4,5,6,7,8)")
    assert sorted(value for [(_, value)] in swept) == list(range(1, 9))
    assert all(text == f"n={value}" for [(text, value)] in swept)


def test_a_mapping_merges_into_the_mapping_there():
    # Hydra: OmegaConf.update(cfg, key, value, merge=True) for key=, ++key= alike.
    assert applied("d={a:5}")["d"] == {"a": 5, "b": 2}
    assert applied("d={}")["d"] == {"a": 1, "b": 2}
    assert applied("++trainer={devices:2}")["trainer"] == {"max_steps": 100, "precision": 32, "devices": 2}
    assert applied("~d", "+d={a:5}")["d"] == {"a": 5}


def test_a_list_value_replaces_the_list_there():
    assert applied("list=[9]")["list"] == [9]


def test_a_mapping_given_for_a_list_is_a_one_line_error():
    assert refusal("list={a:1}") == ("list={a:1}: Cannot merge DictConfig with ListConfig; write ~list +list={a:1} "
                                     "to replace list whole")


def test_deleting_with_a_value_deletes_only_where_the_key_holds_it():
    # Hydra: "Could not delete from config. The value of 'name' is foo and not bar."
    assert refusal("~name=bar") == "~name=bar: name is 'foo', not 'bar'; write ~name to delete it whatever it holds"
    assert "name" not in applied("~name=foo")
    assert "n" not in applied("~n=10.0")  # compared as values: 10 == 10.0
    assert "d" not in applied("~d={a:1,b:2}")
    assert refusal("~name=").startswith("~name=: name is 'foo', not ''")


def test_a_key_below_a_plain_value_is_an_unknown_key():
    assert refusal("lr.x=1").startswith("lr.x=1: no key 'lr.x' in the config")
    assert refusal("trainer.max_steps.x=1").startswith("trainer.max_steps.x=1: no key 'trainer.max_steps.x' in the config")


def test_forcing_a_key_below_a_plain_value_makes_it_a_mapping():
    # Hydra: ++lr.x=1 turns lr into {x: 1}.
    assert applied("++lr.x=1")["lr"] == {"x": 1}
    assert applied("++d.a.b=1")["d"] == {"a": {"b": 1}, "b": 2}


def test_adding_past_the_end_of_a_list_is_a_one_line_error():
    assert refusal("++list.3=4") == "++list.3=4: list has no element 3 and a list does not grow by index; give the whole list (list=[...])"


def test_an_interpolation_is_taken_as_written():
    config = applied("lr=${n}", "trainer.precision=${name}")
    assert config["lr"] == "${n}" and config["trainer"]["precision"] == "${name}"
    assert OmegaConf.create(config).lr == 10


def test_interval_in_a_grid_sweep_is_a_one_line_error():
    with pytest.raises(ovr.OverrideError, match=r"^lr=interval\(0,1\): interval\(\) describes a search space"):
        ovr.parse(["lr=interval(0,1)"], {}, multirun=True)


def test_a_parse_error_gives_the_grammars_reason():
    with pytest.raises(ovr.OverrideError) as caught:
        ovr.parse(["name=json_str({a:1})"], {}, multirun=False)
    assert "Unknown function 'json_str' Available: bool,choice" in str(caught.value) and "\n" not in str(caught.value)
