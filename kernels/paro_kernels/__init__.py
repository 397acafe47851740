"""paro's attention kernels and their plain-torch reference.

Nothing here knows models, recipes or plans: only tensors, token orders and block masks.
The repository keeps them in its `kernels/` folder, but they import as `paro_kernels`:
`kernels` is the import name of Hugging Face's kernel hub package, which transformers and
diffusers import, so `kernels/` itself is no package and nothing of paro's answers to that name.
"""
