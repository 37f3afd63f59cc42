"""K-FAC / SP-NGD natural-gradient preconditioning (see ``KFAC``)."""

from app.kfac.preconditioner import KFAC

__all__ = ["KFAC"]
