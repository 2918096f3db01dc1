"""neurolang: find, classify, score and train the language-related neurons of an LLM."""
from neurolang.adapters import GROUPS, ModelAdapter
from neurolang.classify import Classification, classify
from neurolang.detect import NeuronSets, detect
from neurolang.errors import NeurolangError
from neurolang.eval import ModelRunner, evaluate
from neurolang.impact import compute_impacts
from neurolang.models import load_model
from neurolang.oracle import oracle_impacts, verify

__version__ = "0.1.0"
__all__ = ["GROUPS", "Classification", "ModelAdapter", "ModelRunner", "NeurolangError", "NeuronSets", "classify", "compute_impacts", "detect", "evaluate", "load_model", "oracle_impacts", "verify"]
