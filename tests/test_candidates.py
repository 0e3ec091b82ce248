"""Which candidate formats each weight is offered."""

from cet_onnx.allocation.allocate import candidate_formats, format_available
from cet_onnx.graph.weights import WeightInfo
from cet_onnx.options import candidate_block
from cet_onnx.quant.quantizer import WeightFormat


def test_default_candidates_are_per_channel_and_blocks_of_32_and_128_per_bit_width():
    labels = [f.label for f in candidate_formats((2, 4, 8), candidate_block(None, None))]
    assert labels == ["int2a/ch", "int2a/b32", "int2a/b128", "int4a/ch", "int4a/b32", "int4a/b128",
                      "int8/ch", "int8/b32", "int8/b128"]
    assert candidate_block(None, 64) == (64,) and candidate_block((0,), None) == ()


def test_fine_blocks_need_one_block_and_coarse_blocks_two():
    conv = WeightInfo("c", (32, 32, 3, 3), "Conv", 0, 1)          # a block of 32 still scales each kernel position
    fc = WeightInfo("f", (10, 128), "Gemm", 0, 1)
    wide = WeightInfo("m", (384, 1536), "MatMul", 1, 0)
    b32, b128 = WeightFormat(4, "block", 32), WeightFormat(4, "block", 128)
    assert format_available(conv, b32) and not format_available(conv, b128)
    assert format_available(fc, b32) and not format_available(fc, b128)
    assert format_available(wide, b128)


def test_embedding_tables_take_only_their_fast_lookup_formats():
    table = WeightInfo("e", (1000, 384), "Gather", 0, 1)
    assert format_available(table, WeightFormat(8)) and format_available(table, WeightFormat(4, "block", 128))
    assert not format_available(table, WeightFormat(4)) and not format_available(table, WeightFormat(2, "block", 32))


def test_conv_kernels_take_no_int8_blocks():
    # onnxruntime fuses a blocked INT8 kernel into QLinearConv and then fails at run time
    conv = WeightInfo("c", (64, 64, 1, 1), "Conv", 0, 1)
    fc = WeightInfo("f", (64, 64), "MatMul", 1, 0)
    b32 = WeightFormat(8, "block", 32)
    assert not format_available(conv, b32) and format_available(fc, b32)
    assert format_available(conv, WeightFormat(8)) and format_available(conv, WeightFormat(4, "block", 32))
