"""Long Expressive Memory (Rusch, Mishra, Erichson, Mahoney, ICLR 2022): the layer.

    import lem
    rnn = lem.LEM(input_size, hidden_size, num_layers=1, dt=1.0)   # nn.LSTM's interface

The training harness is lem.train, the data helpers lem.data, the research tools lem.tools;
importing lem loads none of them.
"""
from .nn import LEM, LEMCell, RNNModel, ShapeError, load_reference_state_dict, make_rnn

__all__ = ["LEM", "LEMCell", "RNNModel", "ShapeError", "load_reference_state_dict", "make_rnn"]
