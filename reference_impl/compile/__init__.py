"""torch.compile backend: Dynamo -> AOT (functional aten graph) -> passes -> graph or inductor."""

from reference_impl.compile.config import CompileConfig, sp_active, token_buckets

__all__ = ["CompileConfig", "sp_active", "token_buckets"]
