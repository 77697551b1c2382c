"""What calibration reads from the torch model: the calibration data, observer states of each
layer's input, layer-input rows and mean rows, virtual data, the memory budget."""
