"""Small example models trained on scikit-learn's bundled data sets."""
