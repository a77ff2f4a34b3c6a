"""Engine integrations: each module imports its engine only when it is used.

* :mod:`flexkv_store.integrations.vllm` — a storage tier for vLLM 0.33's native KV
  offloading (``TieringOffloadingSpec``) and a connector that carries tenants to it.
"""
