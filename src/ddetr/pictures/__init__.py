"""Pictures: drawing detections, attention pictures, learning-curve plots."""
