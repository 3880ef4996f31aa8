"""Beyond one machine: indexing on a Ray cluster (`ray_update`, `index_folder`, `cbir index
--ray`), Hamming search over shards held by Ray actors (`ShardedHammingIndex`), and a local
throwaway cluster for tests and trials (`LocalRayCluster`). Milvus export and search live in
cbir_engine.index.milvus. Ray is imported only when used: pip install 'cbir-engine[distributed]'.
"""

from cbir_engine.distributed.local_cluster import ClusterStartError, LocalRayCluster
from cbir_engine.distributed.ray_index import (
    DistributedIndexError,
    RayOptions,
    RayOptionsError,
    index_folder,
    ray_update,
)
from cbir_engine.distributed.sharded import (
    ShardedHammingIndex,
    ShardedRangeResult,
    ShardedResult,
    ShardUnavailableError,
    merge_topk,
)

__all__ = ["ClusterStartError", "DistributedIndexError", "LocalRayCluster", "RayOptions", "RayOptionsError",
           "ShardUnavailableError", "ShardedHammingIndex", "ShardedRangeResult", "ShardedResult",
           "index_folder", "merge_topk", "ray_update"]
