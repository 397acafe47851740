"""paro's attention kernels and their plain-torch reference.

Nothing here knows models, recipes or plans: only tensors, token orders and block masks.
`PARO_KERNELS` marks this package as paro's own, so that a different top-level package named
`kernels` (Hugging Face publishes one) shadowing it is detected instead of silently imported.
"""

PARO_KERNELS = True
