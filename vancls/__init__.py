"""vancls: the library shared by train.py, validate.py, predict.py, export.py and benchmark.py
(devices and distributed setup, data, the train/eval engine, checkpoints, logging and reports)."""
