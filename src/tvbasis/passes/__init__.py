"""The streaming passes over a pretrained model and T fine-tunes: the Gram pass, the merge pass, the global
trim-threshold pass and the materialisation pass of a build. Each is a map of a picklable work unit over work
items (``engine.map``) followed by a small reduction on the driver."""

from tvbasis.passes.gram import GramResult, GramTask, compute_gram, cross_of, gram_of, row_sq_norms
from tvbasis.passes.materialise import WHOLE_VECTOR, MaterialiseTask
from tvbasis.passes.merge import MergeProducer, fisher_rows, merge_task_vectors, merge_tensor, open_fisher
from tvbasis.passes.thresholds import DeltaChunk, operand_thresholds, taskset_thresholds

__all__ = ["WHOLE_VECTOR", "DeltaChunk", "GramResult", "GramTask", "MaterialiseTask", "MergeProducer", "compute_gram",
           "cross_of", "fisher_rows", "gram_of", "merge_task_vectors", "merge_tensor", "open_fisher",
           "operand_thresholds", "row_sq_norms", "taskset_thresholds"]
