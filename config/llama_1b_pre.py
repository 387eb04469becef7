# Llama 1B with Pre-LN, the paper's recipe as the authors' code ran it
# (1.34B parameters; C4 validation perplexity 17.02 in the paper's Table 1).
# The shared recipe is config/llama_paper.py; the LNS twin is llama_1b_lns.py; other schemes are one flag away.
#   python data/c4/prepare.py --layout rows --shards 144 --val_shards 2    # one pass of its 51.20M rows
#   torchrun --standalone --nproc_per_node=8 train.py config/llama_1b_pre.py

from config.llama_paper import *  # noqa: F401,F403

out_dir = 'out/llama_1b_pre'
norm_scheme = 'pre'
n_layer = 24
n_head = 32
n_embd = 2048
ffn_hidden = 5461

# the most sequences one GPU runs at once (the authors: 8 GPUs x 32, 2 micro-steps, 512 a step); lower it when a
# GPU runs out of memory: the 512 stay. The authors' estimator is computed as their 8 GPUs x 32 rows did.
batch_size = 32
authors_eval_gpus = 8
authors_eval_batch_size = 32

learning_rate = 5e-4
min_lr = 5e-5
max_iters = 100000
warmup_iters = 1000
