# Llama 130M with Pre-LN, the paper's recipe as the authors' code ran it
# (134M parameters; C4 validation perplexity 26.73 in the paper's Table 1).
# The shared recipe is config/llama_paper.py; the LNS twin is llama_130m_lns.py; other schemes are one flag away.
#   python data/c4/prepare.py --layout rows --shards 29 --val_shards 2    # one pass of its 10.24M rows
#   python train.py config/llama_130m_pre.py

from config.llama_paper import *  # noqa: F401,F403

out_dir = 'out/llama_130m_pre'
norm_scheme = 'pre'
n_layer = 12
n_head = 12
n_embd = 768
ffn_hidden = 2048

# the most sequences one GPU runs at once (the authors: 1 GPU x 64, 8 micro-steps, 512 a step); lower it when a
# GPU runs out of memory: the 512 stay. The authors' estimator is computed as their 1 GPU x 64 rows did.
batch_size = 64
authors_eval_gpus = 1
authors_eval_batch_size = 64

learning_rate = 1e-3
min_lr = 1e-4
max_iters = 20000
warmup_iters = 2000
