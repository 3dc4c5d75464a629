"""The test suite: one module per package of src/tvbasis; tiny models built in tests/tinymodels.py."""
