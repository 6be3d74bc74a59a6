"""warmtune as a Label Studio ML backend (routes in app.routes.labelstudio).

- payloads: what Label Studio sends, the labelling config, and pre-annotations in its format.
- client: task images and the project's annotations, fetched from Label Studio with its token.
- annotations: which update set stands for each annotation; events applied in revision order.

Each annotation is one update set of one image, stored under an idempotency key made of its
project, task, annotation and label: an event sent twice stores nothing new. An edit that changes
the label stores the image under the new label and withdraws the set of the old one
(Stores.withdraw); an edit back restores it; a deleted or skipped annotation withdraws its set. So
an annotation has at most one label in the replay memory.
"""
