"""Readers for formats other projects define, written here from their public specs.

recordio.py     MXNet RecordIO (.rec/.idx): dmlc-core recordio.h, mxnet python/mxnet/recordio.py
insightface.py  InsightFace's RecordIO face-set layout and .bin verification pairs

See third_party/README.md at the repository root. The code lives inside the `bigbatch` package
so that it is installed with it (pyproject packages only `bigbatch*`).
"""
