"""nn: modules, the Transformer family, losses, optimizers and checkpoints, built from
engine ops only (so the jit and every backend run them unchanged).

    import engine as eg
    from engine import nn
    model = nn.CausalLM(vocab_size=100, d_model=64, nhead=4, num_layers=2, dim_feedforward=256)
    opt = nn.optim.AdamW(model.parameters(), lr=1e-3)
    loss = nn.functional.cross_entropy(model(tokens), targets)
    loss.backward(); opt.step(); opt.zero_grad()
    nn.save("ckpt.npz", model, opt, step=1)

Linear weights are stored (in, out): y = x @ W + b (see nn.Linear and nn.interop for
PyTorch weights).
"""
from . import amp, functional, init, optim
from . import generation
from .attention import KVCache, MultiheadAttention
from .checkpoint import CheckpointError, load, save
from .containers import ModuleDict, ModuleList, Sequential
from .functional import causal_mask, padding_mask
from .interop import convert_torch_state_dict, load_torch_state_dict
from .layers import (GELU, Dropout, Embedding, FeedForward, Identity, LayerNorm, Linear, LogSoftmax,
                     ReLU, Sigmoid, Softmax, Tanh)
from .losses import CrossEntropyLoss, MSELoss, NLLLoss
from .generation import beam_search, generate
from .models import CausalLM, MaskedLM, MaskedLMHead, Seq2SeqTransformer, TransformerEmbedding
from .module import IncompatibleKeys, Module, StateDictError
from .parameter import Parameter
from . import parallel
from .parallel import DistributedDataParallel
from .training import plot_losses, read_log, train
from .tokenizers import BPETokenizer, CharTokenizer, TokenizerError, load_tokenizer
from .masking import mask_tokens
from .positional import LearnedPositionalEmbedding, PositionalEncoding, sinusoidal_table
from .transformer import (DecoderCache, Transformer, TransformerDecoder, TransformerDecoderLayer,
                          TransformerEncoder, TransformerEncoderLayer)
from .utils import functional_call, swapped_parameters

__all__ = [
    "functional", "init", "optim", "Module", "Parameter", "Sequential", "ModuleList", "ModuleDict",
    "Linear", "Embedding", "LayerNorm", "Dropout", "Identity", "ReLU", "GELU", "Tanh", "Sigmoid",
    "Softmax", "LogSoftmax", "FeedForward", "CrossEntropyLoss", "MSELoss", "NLLLoss",
    "PositionalEncoding", "LearnedPositionalEmbedding", "sinusoidal_table", "MultiheadAttention",
    "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
    "TransformerDecoder", "Transformer", "TransformerEmbedding", "Seq2SeqTransformer", "CausalLM",
    "MaskedLM", "MaskedLMHead", "causal_mask", "padding_mask", "save", "load", "CheckpointError",
    "StateDictError", "IncompatibleKeys", "convert_torch_state_dict", "load_torch_state_dict",
    "functional_call", "swapped_parameters", "generation", "generate", "beam_search", "KVCache",
    "DecoderCache", "train", "read_log", "plot_losses", "parallel", "DistributedDataParallel",
    "CharTokenizer", "BPETokenizer", "load_tokenizer", "TokenizerError", "mask_tokens",
]
