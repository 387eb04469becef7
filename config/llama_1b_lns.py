# Llama 1B with LayerNorm Scaling, the paper's recipe as the authors' code ran it
# (1.34B parameters; C4 validation perplexity 15.71 in the paper's Table 1).
# Everything but the scheme comes from llama_1b_pre.py.
#   torchrun --standalone --nproc_per_node=8 train.py config/llama_1b_lns.py

from config.llama_1b_pre import *  # noqa: F401,F403

out_dir = 'out/llama_1b_lns'
norm_scheme = 'lns'
