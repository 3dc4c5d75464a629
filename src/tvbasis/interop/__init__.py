"""Other tools' formats: the paper's released bases, both ways (``paper_tvb``), and mergekit's YAML merge configs
(``mergekit``, read by ``tvbasis merge --config``)."""

from tvbasis.interop.paper_tvb import export_tvb, import_tvb, read_tvb_folder

__all__ = ["export_tvb", "import_tvb", "read_tvb_folder"]
