"""Generated studies with known truth: the demo's studies, the models' training data, the tests'
inputs. Chest CT, brain MRI and retina phantoms, simple series, and the one writer they share."""
