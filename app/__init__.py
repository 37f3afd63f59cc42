"""spngd: distributed second-order (K-FAC / SP-NGD) training of ResNets on GPU clusters."""

__version__ = "0.1.0"
