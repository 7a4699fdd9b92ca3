"""Serving: the predictor with calibrated probabilities, the service behind the app and API, uploads and
archives, Grad-CAM overlays, the Gradio app and the Space publisher. Never imports training or evaluation."""
