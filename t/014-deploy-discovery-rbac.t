# The RBAC of Kubernetes discovery, deploy/kubernetes/discovery-rbac.yaml, without a cluster: its YAML parses
# (python3-yaml); the RoleBinding binds the ServiceAccount of deploy/kubernetes/gateway.yaml to the Role; the Role
# grants exactly get, list and watch on discovery.k8s.io endpointslices (what discovery/kubernetes.lua calls: list
# and watch of /apis/discovery.k8s.io/v1/namespaces/<ns>/endpointslices).
use strict;
use warnings;
use lib 't/lib';
use Test::More;
use JSON::PP ();
use ScratchNginx qw(repo_root);

my $repo = repo_root();
my $py = q{python3 -c 'import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))'};
my $json = `$py '$repo/deploy/kubernetes/discovery-rbac.yaml' 2>&1`;
plan skip_all => "python3-yaml not available: $json" if $json =~ /No module named/;
is($? >> 8, 0, 'the YAML parses with python3-yaml') or BAIL_OUT($json);
my @docs = @{ JSON::PP::decode_json($json) };
my ($role) = grep { $_->{kind} eq 'Role' } @docs;
my ($binding) = grep { $_->{kind} eq 'RoleBinding' } @docs;
is(scalar @docs, 2, 'a Role and a RoleBinding');
is_deeply($role->{rules}, [{ apiGroups => ['discovery.k8s.io'], resources => ['endpointslices'],
                             verbs => [qw(get list watch)] }], 'the Role grants get, list, watch on endpointslices');
my $gw = JSON::PP::decode_json(`$py '$repo/deploy/kubernetes/gateway.yaml'`);
my ($sa) = grep { $_->{kind} eq 'ServiceAccount' } @$gw;
is_deeply($binding->{subjects}, [{ kind => 'ServiceAccount', name => $sa->{metadata}{name},
                                   namespace => $sa->{metadata}{namespace} }], "it binds the gateway's ServiceAccount");
is_deeply($binding->{roleRef}, { apiGroup => 'rbac.authorization.k8s.io', kind => 'Role', name => $role->{metadata}{name} },
          'to the Role');
is($role->{metadata}{namespace}, $binding->{metadata}{namespace}, 'in one namespace');
done_testing();
