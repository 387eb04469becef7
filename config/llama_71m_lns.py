# Llama 71M with LayerNorm Scaling, the paper's recipe as the authors' code ran it
# (71M parameters; not in the paper's Table 1).
# Everything but the scheme comes from llama_71m_pre.py.
#   python train.py config/llama_71m_lns.py

from config.llama_71m_pre import *  # noqa: F401,F403

out_dir = 'out/llama_71m_lns'
norm_scheme = 'lns'
