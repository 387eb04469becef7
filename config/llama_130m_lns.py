# Llama 130M with LayerNorm Scaling, the paper's recipe as the authors' code ran it
# (134M parameters; C4 validation perplexity 25.76 in the paper's Table 1).
# Everything but the scheme comes from llama_130m_pre.py.
#   python train.py config/llama_130m_lns.py

from config.llama_130m_pre import *  # noqa: F401,F403

out_dir = 'out/llama_130m_lns'
norm_scheme = 'lns'
