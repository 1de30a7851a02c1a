import pytest

from tests.results_factory import spec
from wwcli.loaders.interface import LayerType
from wwcli.selection import SelectionError, parse_layers, select_layers

LAYERS = [
    spec(0, "flatten", LayerType.OTHER, (), skip_reason="no weights"),
    spec(1, "dense", LayerType.DENSE, (784, 300)),
    spec(2, "dense_1", LayerType.DENSE, (300, 100)),
    spec(3, "conv", LayerType.CONV2D, (3, 3, 3, 16)),
    spec(4, "encoder.0.query", LayerType.DENSE, (64, 64)),
    spec(5, "encoder.1.query", LayerType.DENSE, (64, 64)),
    spec(6, "embed", LayerType.EMBEDDING, (1000, 64)),
    spec(7, "lm_head", LayerType.DENSE, (64, 1000)),
    spec(8, "12", LayerType.DENSE, (64, 64)),
]


def ids(expression: str) -> list[int]:
    return [layer.layer_id for layer in select_layers(LAYERS, parse_layers(expression))]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1", [1]),
        ("1,3", [1, 3]),
        ("3,1", [1, 3]),
        ("2-5", [2, 3, 4, 5]),
        ("encoder.*.query", [4, 5]),
        ("lm_head", [7]),
        ("dense", [1, 2, 4, 5, 7, 8]),
        ("conv2d", [3]),
        ("conv", [3]),
        ("embedding", [6]),
        ("-3", [0, 1, 2, 4, 5, 6, 7, 8]),
        ("-lm_head,-0", [1, 2, 3, 4, 5, 6, 8]),
        ("dense,-lm_head", [1, 2, 4, 5, 8]),
        ("2-5,-encoder.1.*", [2, 3, 4]),
        ("name:dense", [1]),
        ("name:12", [8]),
        ("id:7", [7]),
        ("id:1-2", [1, 2]),
        ("type:embedding", [6]),
        (" 1 , 2 ", [1, 2]),
    ],
)
def test_every_form_selects_the_right_layers(expression: str, expected: list[int]) -> None:
    assert ids(expression) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("42", r"--layers 42 matches no layer; layers are: 0 flatten \(other\); 1 dense"),
        ("decoder.*", "decoder.* matches no layer"),
        ("-nothing", "--layers -nothing matches no layer"),
        ("5-2", "empty id range"),
        ("1,,2", "empty token"),
        ("", "--layers is empty"),
        ("-", "empty token"),
        ("type:lstm", "unknown layer type 'lstm'"),
        ("id:abc", "is not an id"),
        ("name:", "nothing after name:"),
    ],
)
def test_bad_or_unmatched_expressions_raise(expression: str, message: str) -> None:
    with pytest.raises(SelectionError, match=message):
        select_layers(LAYERS, parse_layers(expression))
