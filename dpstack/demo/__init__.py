"""`dpstack demo`: the end-to-end application that drives every package
(collect, train, export, serve, evaluate, report), as a resumable pipeline."""
