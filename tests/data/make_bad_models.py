"""Makes the malformed model files some tests load (needs TensorFlow: `pip install .[train]`;
the files are committed, so that the tests run without it). Untrained, a few kB each:

- check_two_scores.tflite: a plate check's input (32x96x3) with a 2-way softmax, where a check
  has one score (and may have a box head).
- reader_two_outputs.tflite: a reader's input (40x128x1) with its CTC output (1, 64, 37) and
  a second output.
"""

from pathlib import Path

import tensorflow as tf

HERE = Path(__file__).resolve().parent


def _save(model: tf.keras.Model, name: str) -> None:
    (HERE / name).write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def main() -> None:
    L = tf.keras.layers
    inp = tf.keras.Input((32, 96, 3), batch_size=1)
    _save(tf.keras.Model(inp, L.Dense(2, activation="softmax")(L.GlobalAveragePooling2D()(inp))),
          "check_two_scores.tflite")
    inp = tf.keras.Input((40, 128, 1), batch_size=1)
    x = L.Conv2D(37, (20, 4), strides=(20, 4))(inp)  # 2x32
    seq = L.Softmax()(L.Reshape((64, 37))(x))
    _save(tf.keras.Model(inp, [seq, L.GlobalAveragePooling2D()(x)]), "reader_two_outputs.tflite")


if __name__ == "__main__":
    main()
