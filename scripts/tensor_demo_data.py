"""The data sets of the demo tensor models, shared by scripts/make_tensor_models.py (training)
and tests/reference/make_tensor_fixtures.py (reference inputs): both must see the same
preprocessing and the same held-out split. Everything ships inside scikit-learn; nothing is
downloaded."""

import numpy as np
from sklearn.datasets import load_digits, make_classification
from sklearn.model_selection import train_test_split

SEED = 0


def digits_features():
    """sklearn's 8x8 handwritten digits as 64 features in [0, 1]: (x_train, x_test, y_train, y_test)."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return train_test_split(x, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target)


def digits_images():
    """The same digits as 28x28x1 images (NHWC, as a Keras MNIST model takes them): each pixel
    repeated 3x3 to 24x24, then 2 px of zero border, like MNIST's padded digits."""
    x_train, x_test, y_train, y_test = digits_features()

    def to_images(x):
        images = x.reshape(-1, 8, 8)
        images = np.kron(images, np.ones((3, 3), dtype=np.float32))
        images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
        return images[..., None].astype(np.float32)

    return to_images(x_train), to_images(x_test), y_train, y_test


def tabular():
    """A synthetic 10-class tabular problem with 100 raw (unscaled) features."""
    x, y = make_classification(
        n_samples=5000,
        n_features=100,
        n_informative=30,
        n_redundant=10,
        n_classes=10,
        n_clusters_per_class=1,
        class_sep=1.5,
        random_state=SEED,
    )
    # Raw features on different scales, as a real table has: the model folds the scaling in.
    scales = np.linspace(0.5, 50.0, 100)
    x = (x * scales + np.linspace(-20.0, 20.0, 100)).astype(np.float32)
    return train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)
