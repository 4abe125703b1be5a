"""apg: amortized population Gibbs samplers built on tmcgraph (work in progress)."""

__all__: list = []
