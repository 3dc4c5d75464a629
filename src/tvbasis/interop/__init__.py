"""Other tools' basis formats, both ways: the paper's released bases (``paper_tvb``)."""

from tvbasis.interop.paper_tvb import export_tvb, import_tvb, read_tvb_folder

__all__ = ["export_tvb", "import_tvb", "read_tvb_folder"]
