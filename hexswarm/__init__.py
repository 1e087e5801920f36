"""hexswarm: serve Llama-family models over a peer-to-peer swarm of heterogeneous GPU hosts."""

__version__ = "0.1.0"
