"""Generated gRPC stubs for the rlhfkit.v1 API (protos/rlhfkit/v1/*.proto).

Regenerate with protos/generate.sh; tests/test_protos.py checks they are current.
"""
