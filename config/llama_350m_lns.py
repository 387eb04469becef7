# Llama 350M with LayerNorm Scaling, the paper's recipe as the authors' code ran it
# (368M parameters; C4 validation perplexity 18.20 in the paper's Table 1).
# Everything but the scheme comes from llama_350m_pre.py.
#   torchrun --standalone --nproc_per_node=8 train.py config/llama_350m_lns.py   # or any divisor of 512 GPUs

from config.llama_350m_pre import *  # noqa: F401,F403

out_dir = 'out/llama_350m_lns'
norm_scheme = 'lns'
