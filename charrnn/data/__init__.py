"""The text, before any model: reading a corpus (files, directories, stdin; UTF-8 checked,
or another encoding decoded), its character vocabulary, the prepared id file every run maps
(its format and reader in `prepared`, its writing in `encode`), and the batch layouts of
training (`batches`: stateful streams, random windows, restarting streams).

May import: the shared top-level modules (errors, config, ...). Nothing about models.
"""
