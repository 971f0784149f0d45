import pytest

from neurosem.errors import NeurosemError
from neurosem.ids import NeuronId, check_neuron, closest_names, parse_neuron


def test_parse_plain_and_dotted():
    assert parse_neuron("layer4:312") == NeuronId("layer4", 312)
    assert parse_neuron(" layer4.1.conv2:7 ") == NeuronId("layer4.1.conv2", 7)
    assert str(NeuronId("layer4", 312)) == "layer4:312"


@pytest.mark.parametrize("bad", ["layer4", "layer4:", ":3", "layer4:x", "layer4:-1", "layer4:1.5"])
def test_malformed_ids_are_one_line_errors(bad):
    with pytest.raises(NeurosemError) as err:
        parse_neuron(bad)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"malformed neuron id {bad.strip()!r}")


def test_check_neuron_layer_and_range():
    units = {"layer3": 4, "layer4": 8}
    check_neuron(NeuronId("layer4", 7), units)
    with pytest.raises(NeurosemError, match=r"out of range: layer4 has 8 units \(0..7\)"):
        check_neuron(NeuronId("layer4", 8), units)
    with pytest.raises(NeurosemError, match="layers: layer3, layer4"):
        check_neuron(NeuronId("layer5", 0), units)


def test_closest_names():
    assert closest_names("layr4", ["layer1", "layer4", "fc"])[0] == "layer4"
