"""Pictures: drawing detections, attention pictures, learning-curve plots, evaluation pictures
(precision-recall curves, confusion matrix)."""
