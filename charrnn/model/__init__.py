"""What a trained model is, in memory: the recurrent cells written by hand (`cells`: LSTM with
peepholes or layer norm, GRU, vanilla RNN, beside nn.LSTM's fused one), the network around
them (`network`: CharRNN, embedding -> cells -> head, its learned start state), and the
start mix (`startmix`: the k-gram prior over the first predictions, saved with the weights).

May import: the shared top-level modules and charrnn.data.
"""
