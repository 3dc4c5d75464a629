"""tvbasis: task vector bases — compress T task vectors into M < T basis vectors and keep task arithmetic working."""

__version__ = "0.1.0"
