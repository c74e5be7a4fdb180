"""After training: noise cleaning of the training set, cRT, export/import, the HTML report."""
