# Llama 350M with Pre-LN, the paper's recipe as the authors' code ran it
# (368M parameters; C4 validation perplexity 19.58 in the paper's Table 1).
# The shared recipe is config/llama_paper.py; the LNS twin is llama_350m_lns.py; other schemes are one flag away.
#   python data/c4/prepare.py --layout rows --shards 87 --val_shards 2    # one pass of its 30.72M rows
#   torchrun --standalone --nproc_per_node=8 train.py config/llama_350m_pre.py   # or any divisor of 512 GPUs

from config.llama_paper import *  # noqa: F401,F403

out_dir = 'out/llama_350m_pre'
norm_scheme = 'pre'
n_layer = 24
n_head = 16
n_embd = 1024
ffn_hidden = 2736

# the most sequences one GPU runs at once (the authors: 4 GPUs x 128, one micro-step, 512 a step); lower it when a
# GPU runs out of memory: the 512 stay. The authors' estimator is computed as their 4 GPUs x 128 rows did.
batch_size = 128
authors_eval_gpus = 4
authors_eval_batch_size = 128

learning_rate = 5e-4  # the authors' script; the paper's text says 1e-3
min_lr = 5e-5
max_iters = 60000
warmup_iters = 6000
