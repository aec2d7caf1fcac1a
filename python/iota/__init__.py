"""iota: train one language model on a swarm of unreliable computers."""

from iota.errors import CodecError, FrameError, IotaError

__version__ = "0.1.0"
__all__ = ["CodecError", "FrameError", "IotaError", "__version__"]
