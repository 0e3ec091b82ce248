from onnx import helper

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._testing import make_model, tensor_info


def test_free_names_are_kept_taken_ones_get_the_first_free_suffix():
    m = make_model([helper.make_node("Neg", ["x"], ["t_scale"], name="n"), helper.make_node("Neg", ["t_scale"], ["t_scale_1"])],
                   [tensor_info("x")], [tensor_info("t_scale_1")])
    names = UniqueNames(m.graph)
    assert names.value("t_zero_point") == "t_zero_point"
    assert names.value("t_zero_point") == "t_zero_point_1"       # earlier answers count as taken
    assert names.value("t_scale") == "t_scale_2" and names.value("x") == "x_1"
    assert names.node("n") == "n_1" and names.node("m") == "m"
