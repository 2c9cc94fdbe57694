module shoal.local/kubeassets

go 1.26
