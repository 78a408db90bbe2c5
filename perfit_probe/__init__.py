"""perfit-probe: study and use personalization shifts in the hidden states of language models.

The toolkit follows the PerFit paper (ICLR 2026): delta vectors of users' hidden states
(with versus without their history) lie in a low-rank subspace, made of a collective shift
shared by all users plus a personal shift per user; PerFit trains a two-stage low-rank
representation intervention (LoReFT) on a frozen base model to exploit this.
"""

__version__ = "0.1.0"
