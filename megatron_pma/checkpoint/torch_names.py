"""The torch names a checkpoint's pickles use for scalar types, known without importing torch.

A ``torch.dtype`` pickles as the global ``torch.<name>``; ``torch.save`` names a tensor's storage
by its legacy class (``torch.FloatStorage``, ...).
"""

# name, bytes, floating point, numpy dtype (None: numpy has none)
DTYPES = [("float32", 4, True, "<f4"), ("float64", 8, True, "<f8"), ("float16", 2, True, "<f2"),
          ("bfloat16", 2, True, None), ("int64", 8, False, "<i8"), ("int32", 4, False, "<i4"),
          ("int16", 2, False, "<i2"), ("int8", 1, False, "i1"), ("uint8", 1, False, "u1"),
          ("bool", 1, False, "?"), ("complex64", 8, False, "<c8"), ("complex128", 16, False, "<c16"),
          ("float8_e4m3fn", 1, True, None), ("float8_e5m2", 1, True, None),
          ("uint16", 2, False, "<u2"), ("uint32", 4, False, "<u4"), ("uint64", 8, False, "<u8")]

# storage class -> dtype name
STORAGE_DTYPES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
                  "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                  "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
                  "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
                  "ComplexDoubleStorage": "complex128", "Float8_e4m3fnStorage": "float8_e4m3fn",
                  "Float8_e5m2Storage": "float8_e5m2", "UInt16Storage": "uint16",
                  "UInt32Storage": "uint32", "UInt64Storage": "uint64"}
