"""The benchmarks' shared helpers live in the experiment harness,
:mod:`torch_nerva.compare.harness` (one environment record, one results writer, the interleaved
timing); this module only re-exports them for scripts written against ``from common import``."""
from torch_nerva.compare.harness import (WARMUP, environment, failure_status, field,  # noqa: F401
                                         quartiles, restored_threads, time_interleaved,
                                         write_results)
