"""A bad plugin, callback or data argument ends in one line naming the class, the argument and the
problem (``core/parse_errors.py``), from jsonargparse's own messages."""

from __future__ import annotations

from litplug.core.parse_errors import summarize_parse_error

WRONG_TYPE = """Parser key "model.plugins":
  Does not validate against any of the Union subtypes
  Subtypes: [list[litplug.core.plugin.Plugin], <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'litplug.plugins.ema.EMA':
        Parser key "decay":
          Expected a <class 'float'>. Got value: abc
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='decay', val='abc')
"""

UNKNOWN_OPTION = """Parser key "model.plugins":
  Does not validate against any of the Union subtypes
  Subtypes: [list[litplug.core.plugin.Plugin], <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'litplug.plugins.ema.EMA':
        Option 'decayy' is not accepted
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='decayy', val='0.9')
"""

# the user's class is tried first; the base class's complaint below it is noise
BAD_CHOICE_TWO_CLASSES = """Parser key "trainer.callbacks":
  Does not validate against any of the Union subtypes
  Subtypes: [list[lightning.pytorch.callbacks.callback.Callback], <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'litplug.callbacks.warmup.LEGW':
        Parser key "lr_scaling":
          Expected a typing.Literal['sqrt', 'linear', 'none']. Got value: cubic
    - Problem with given class_path 'lightning.Callback':
        Option 'lr_scaling' is not accepted
    - Expected a <class 'NoneType'>
"""

MISSING = """Parser key "trainer.callbacks":
  Does not validate against any of the Union subtypes
  Errors:
    - Problem with given class_path 'litplug.callbacks.warmup.LEGW':
        the following arguments are required: base_batch_size
    - Not a valid subclass of Callback
"""

UNKNOWN_CLASS = """Parser key "model.plugins":

  - Expected a path but FooPlugin either not accessible or invalid
  - Does not validate against any of the Union subtypes
  Subtypes: [list[litplug.core.plugin.Plugin], <class 'NoneType'>]
  Errors:
    - Expected a dot import path string: FooPlugin
    - Expected a <class 'NoneType'>
  Given value type: <class 'str'>
  Given value: FooPlugin
"""


def test_a_wrong_type_names_the_plugin_class_and_argument() -> None:
    assert summarize_parse_error(WRONG_TYPE) == (
        "plugin EMA (model.plugins), argument 'decay': Expected a <class 'float'>. Got value: abc"
    )


def test_an_unknown_option_lists_what_the_class_takes() -> None:
    summary = summarize_parse_error(UNKNOWN_OPTION)
    assert summary is not None
    assert summary.startswith("plugin EMA (model.plugins): Option 'decayy' is not accepted; it takes: decay,")


def test_the_class_the_user_named_wins_over_the_base_class() -> None:
    assert summarize_parse_error(BAD_CHOICE_TWO_CLASSES) == (
        "callback LEGW (trainer.callbacks), argument 'lr_scaling': "
        "Expected a typing.Literal['sqrt', 'linear', 'none']. Got value: cubic"
    )
    assert summarize_parse_error(MISSING) == (
        "callback LEGW (trainer.callbacks): the following arguments are required: base_batch_size"
    )


def test_an_unknown_class_name_lists_the_known_ones() -> None:
    summary = summarize_parse_error(UNKNOWN_CLASS, {"model.plugins": ["EMA", "EWC"]})
    assert summary == (
        "model.plugins: 'FooPlugin' is not a known plugin class name or import path; the known ones: EMA, EWC"
    )


def test_other_messages_are_left_to_jsonargparse() -> None:
    assert summarize_parse_error("unrecognized arguments: --foo=1") is None
    assert summarize_parse_error('Parser key "data":\n  Does not validate\n  Errors:\n  - odd') is None
    assert summarize_parse_error("") is None


def test_a_plain_option_keeps_its_own_line() -> None:
    message = "Parser key \"trainer.max_steps\":\n  Expected a <class 'int'>. Got value: abc\n"
    assert summarize_parse_error(message) == "trainer.max_steps: Expected a <class 'int'>. Got value: abc"
