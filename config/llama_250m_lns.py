# Llama 250M with LayerNorm Scaling, the paper's recipe as the authors' code ran it
# (247M parameters; C4 validation perplexity 20.35 in the paper's Table 1).
# Everything but the scheme comes from llama_250m_pre.py.
#   torchrun --standalone --nproc_per_node=8 train.py config/llama_250m_lns.py   # or any divisor of 512 GPUs

from config.llama_250m_pre import *  # noqa: F401,F403

out_dir = 'out/llama_250m_lns'
norm_scheme = 'lns'
